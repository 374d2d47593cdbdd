"""Hydra configs (package data; a package so `pkg://` search paths can name it)."""
