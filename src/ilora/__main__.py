"""``python -m ilora`` (and ``torchrun -m ilora``): the `ilora` command."""

import sys

from ilora.cli.main import main

sys.exit(main())
