"""`python -m cloudfed.comparison configs/compare.yaml --tracking-uri sqlite:///mlflow.db`."""

from cloudfed.comparison import main

raise SystemExit(main())
