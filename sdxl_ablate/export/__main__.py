"""`python -m sdxl_ablate.export`: see sdxl_ablate/export/lora_export.py."""

from sdxl_ablate.export.lora_export import main

raise SystemExit(main())
