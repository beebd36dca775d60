"""Built-in backends, loaded through the ``updatebuffer.backends`` entry-point group."""
