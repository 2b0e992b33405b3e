"""HTTP routers of the gateway, one per concern; api/app.py assembles them."""
