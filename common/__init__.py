"""The leaf every part may import: the settings object and the model contract.

It imports nothing of the project, so the proxy image carries `proxy/` and this package only.
"""
