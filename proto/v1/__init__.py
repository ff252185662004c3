"""Generated from proto/loradrop/v1/*.proto by proto/generate.py; do not edit."""
