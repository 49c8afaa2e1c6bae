from shardsurgeon.cli import main

main()
