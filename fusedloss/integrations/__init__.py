"""Integrations with training libraries. Each submodule imports its library when it is itself imported, so
``import fusedloss`` never needs them: ``fusedloss.integrations.transformers`` needs ``pip install
'fusedloss[transformers]'``."""
