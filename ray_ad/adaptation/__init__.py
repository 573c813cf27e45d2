"""Adapting a line to a new, unlabeled domain: label-free candidates, a promotion gate, an operating point."""
