"""Test helpers for medray: a real local S3 server (SeaweedFS)."""

from medray.testing.seaweed import SeaweedError, SeaweedS3, find_weed_binary

__all__ = ["SeaweedS3", "SeaweedError", "find_weed_binary"]
