"""Ingress: where messages come in. SMTP (`smtp`, `mail`), HTTP (`http`: the API, the
webhooks with their `formats`, the console) and the one ingest path both end in (`ingest`)."""
