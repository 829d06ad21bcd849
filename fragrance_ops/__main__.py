from fragrance_ops.cli import main

main()
