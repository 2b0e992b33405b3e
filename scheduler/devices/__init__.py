"""The Device interface and its implementations: NVML GPU, CPU (RAPL or estimate), simulated GPU."""
