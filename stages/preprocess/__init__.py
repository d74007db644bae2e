"""Stages that run before the model: decode, resize, crop, normalize, layout, cast."""
