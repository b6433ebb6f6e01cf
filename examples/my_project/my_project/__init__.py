"""An example project that trains its own model on its own data with dgtrain (docs/extending.md)."""
