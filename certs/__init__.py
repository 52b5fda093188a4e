"""perch-certs: the webhook's CA and serving certificate, and the CA bundle of its registration.

``issue`` makes the certificates (pure, with ``cryptography``), ``inject`` writes the CA bundle into
the MutatingWebhookConfiguration, ``ensure`` keeps a TLS Secret current and is safe to run on every
start of every replica. The chart can use cert-manager instead.
"""
