# A party's own image: the project, the stack's integrations (ZenML loads every component of the
# stack in each step's container) and the party's fsspec filesystems, pinned where gcsfs is.
# Built in the party's cloud and pushed to its own registry; the party reviews what goes in, since
# whoever controls a step's image controls the party (README, "Party policies"). Commands:
#   python -m pipelines._images configs/multicloud.yaml cloudfed-multicloud
# The model (README, "A real model") and CLOUDFED_PARTY_POLICIES are the party's to add on top.
FROM zenmldocker/zenml:0.98.0-py3.11
ARG PACKAGES=""
WORKDIR /app
COPY .cloudfed/stack-requirements.txt /tmp/stack-requirements.txt
COPY pyproject.toml README.md ./
COPY cloudfed cloudfed
COPY steps steps
COPY pipelines pipelines
COPY data_contracts data_contracts
RUN pip install --no-cache-dir . -r /tmp/stack-requirements.txt ${PACKAGES}
ENV ZENML_ANALYTICS_OPT_IN=false HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
