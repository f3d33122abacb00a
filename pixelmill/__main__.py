from pixelmill.commands import main

main()
