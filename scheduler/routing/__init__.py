"""Energy-aware routing: adequacy prediction, model selection, placement, request controls, cascade."""
