from bnscope.cli import main

main()
