"""Long-video methods on diffusers pipelines (each module imports diffusers lazily)."""
