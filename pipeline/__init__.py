"""Stages of the cropmap pipeline and what runs them."""
