"""Built-in sinks of transcribed (file, console, webhook, mqtt), registered explicitly."""
