"""``python -m ilora`` (and ``torchrun -m ilora``): the `ilora` command."""

import os
import sys

from ilora.cli.main import main
from ilora.distributed import launched_by_torchrun

code = main()
if code == 0 and launched_by_torchrun():
    # A torchrun worker that succeeded has left its process group and closed its files by
    # now. It ends here, without interpreter teardown: rarely (twice in fresh-clone CI runs,
    # never in some 70 local ones) a worker aborted after its work was done ("terminate
    # called without an active exception": a C++ thread of the distributed stack destroyed
    # while running, most likely in teardown), and torchrun reported a complete run as
    # failed. Not proven to be the cause; tests/distributed runs with PYTHONFAULTHANDLER so
    # that another occurrence shows where.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
sys.exit(code)
