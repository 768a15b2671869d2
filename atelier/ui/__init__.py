"""``atelier ui``: a local web app over the live trajectory store (runs, trajectories filtered
and paginated on the server, GRPO groups with their rewards and advantages, per-token
log-probs, training curves, policy versions, two runs compared).

    from atelier.ui.app import create_app
    app = create_app(TrajectoryStore("sqlite:///atelier.db"))   # any ASGI server runs it

Starlette and uvicorn load only here (``pip install 'atelier[ui]'``).
"""
