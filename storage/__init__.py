"""Storage URLs, Optuna RDB storage settings, pipeline tables and the artifact store."""
