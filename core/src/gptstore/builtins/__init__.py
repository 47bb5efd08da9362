"""Built-in plugins, registered from :data:`gptstore.manager.DEFAULT_PLUGINS` like any other."""
