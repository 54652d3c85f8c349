"""The HTTP face: the app and its API (`app`), webhooks (`hooks`), the OpenAPI document,
request bodies and limits, tokens (`auth`), allowed hosts and the web console."""
