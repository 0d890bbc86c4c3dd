"""Configuration: ``loader.load_config`` turns a YAML file into a frozen ``model.Config``.

The package itself holds no code, so importing a model type does not pull in the loader.
"""
