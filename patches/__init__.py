"""HookRegistry hooks into SGLang, one module per hooked target."""
