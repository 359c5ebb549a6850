"""Serving a trained model over HTTP on LitServe (`ftlab serve`, docs/serving.md): `api` fills LitServe's hooks
with the `Predictor`, `requests` checks what a request must be, `server` builds and runs the server."""
