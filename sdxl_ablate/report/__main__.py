"""`python -m sdxl_ablate.report`: see sdxl_ablate/report/study.py."""

from sdxl_ablate.report.study import main

raise SystemExit(main())
