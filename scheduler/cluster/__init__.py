"""Ray plumbing: runtime, the Serve application builder, model replicas, node agents, lifecycle, `serve`."""
