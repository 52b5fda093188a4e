"""How long the perch.dev/spec annotation takes to parse: the seed spec, both forms.

    .venv/bin/python benchmarks/spec_parse.py [--number 2000] [--repeat 7]

Three figures per spec, each the best of ``--repeat`` runs of ``--number`` calls (timeit's
advice: the minimum is the run least disturbed by the rest of the machine), with the median
beside it:

* ``parse_spec``: uncached, text to CanarySpec (YAML or JSON loading, validation, the result);
* ``cached_parse_spec``: perch.speccache's cache hit, which is what every admission and every
  tick after the first pays;
* ``load only``: the text to plain dicts and lists (size check, YAML or JSON, duplicate keys),
  without reading them into the spec; ``parse_spec`` minus this is the validation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from perch import spec as spec_module  # noqa: E402
from perch.speccache import cached_parse_spec  # noqa: E402
from tests.seed import SEED_SPEC_CURRENT, SEED_SPEC_EARLY  # noqa: E402


def _loader() -> Callable[[str], object] | None:
    """The function that loads the text into plain data (perch.spec.loading, or the single
    module perch.spec was before it became a package)."""
    try:
        from perch.spec.loading import load_document
    except ImportError:
        return getattr(spec_module, "_load", None)
    return load_document


def _measure(call: Callable[[], object], number: int, repeat: int) -> tuple[float, float]:
    runs = timeit.repeat(call, number=number, repeat=repeat)
    per_call = [run / number * 1e6 for run in runs]
    return min(per_call), statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    texts = {
        "seed, early form (YAML)": SEED_SPEC_EARLY,
        "seed, current form (YAML)": SEED_SPEC_CURRENT,
        "seed, current form (JSON)": json.dumps(yaml.safe_load(SEED_SPEC_CURRENT)),
    }
    loader = _loader()
    print(f"{'spec':28} {'call':18} {'best µs':>9} {'median µs':>10}")
    for label, text in texts.items():
        spec_module.parse_spec(text)  # warm up (imports, compiled patterns)
        cached_parse_spec(text)
        figures = {
            "parse_spec": _measure(
                lambda t=text: spec_module.parse_spec(t), args.number, args.repeat
            ),
            "cached_parse_spec": _measure(
                lambda t=text: cached_parse_spec(t), args.number * 50, args.repeat
            ),
        }
        if loader is not None:
            figures["load only"] = _measure(lambda t=text: loader(t), args.number, args.repeat)
        for call, (best, median) in figures.items():
            print(f"{label:28} {call:18} {best:9.2f} {median:10.2f}")


if __name__ == "__main__":
    main()
