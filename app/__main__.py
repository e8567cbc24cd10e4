import sys

from app.app import main

sys.exit(main())
