"""Stages that run after the model: softmax, top-k with labels."""
