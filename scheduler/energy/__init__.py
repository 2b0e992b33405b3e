"""Energy accounting: meter, attribution, carbon intensity, ledger, metrics."""
