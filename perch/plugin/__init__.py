"""`kubectl perch`: Perch's canary releases from kubectl.

Installed as the console script `kubectl-perch`, which kubectl finds on PATH as a plugin:

- `status [NAME] [-w]`: the table of canaries, or one release at a glance, followed live with -w;
- `validate -f FILE`: the webhook's checks of `perch.dev/spec`, offline (e.g. in CI);
- `promote|abort|retry|pause|resume NAME`: sets the `perch.dev/action` annotation on the
  Deployment (the analyzer acts and clears it), so git keeps owning the spec.

Modules: `cli` (flags and the shell of each subcommand), `glance` (one release's view, pure),
`status` (the table, following a release), `validate` (reading manifests and checking them) and
`render` (colour, tables, numbers).
"""

from perch.plugin.cli import context_namespace, main, request_action
from perch.plugin.status import status_rows

__all__ = ["context_namespace", "main", "request_action", "status_rows"]
