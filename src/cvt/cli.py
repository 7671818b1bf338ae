def main() -> None:  # replaced by the real CLI
    raise SystemExit("cvt: not implemented yet")
