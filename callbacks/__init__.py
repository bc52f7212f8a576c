"""Lightning callbacks (robustness evaluation during training lives here)."""
