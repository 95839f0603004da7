"""Training recipes: each stage reads like setup -> train -> save -> report."""
