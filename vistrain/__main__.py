from vistrain.cli import entrypoint

entrypoint()
