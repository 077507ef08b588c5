"""The `tsimcne` command line: parsing, printing and exit codes over the Python API (tsimcne_map)."""
