"""Model components of s2m_diffusers (each a diffusers `ModelMixin, ConfigMixin`).

Submodules are imported by `s2m_diffusers/__init__.py`, not here, so that importing one component does not pull in
the others.
"""
