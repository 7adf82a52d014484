"""Built-in PEFT methods, one module each."""
