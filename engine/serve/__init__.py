"""`cvr serve`: the engine as an HTTP service (FastAPI + uvicorn), engine/serve/app.py."""
