"""Thin Ray glue over the Ray-free library: Ray Train, Ray Data, Ray Tune and the job pipelines.

Nothing under ``ray_ad/`` outside this package imports Ray.
"""
