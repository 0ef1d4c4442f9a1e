"""Prefect tasks wrapping the loraflow library, one small module each. They pass URIs, paths and
small JSON-able metadata between each other, never models or datasets."""
