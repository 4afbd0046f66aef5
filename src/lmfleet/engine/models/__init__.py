"""Decoder implementations, their configuration parsing, and the weight loader."""
