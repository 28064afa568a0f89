from setuptools import find_packages, setup

# What the example web app (examples/blog) runs on; its test runs in CI too.
BLOG_REQUIRES = ["flask>=3", "gunicorn>=21"]
# What the example Django shop (examples/shop) runs on; its test runs in CI too.
SHOP_REQUIRES = ["django>=5.1", "gunicorn>=21"]
# What the adoption tests run: PEP 249's compliance suite (dbapi20.py), and the
# libraries apps reach PostgreSQL through, on postgresql+dbservice://.
ADOPTION_TEST_REQUIRES = [
    "dbapi-compliance>=1.15",
    "sqlalchemy>=2.0.44",
    "pandas>=2",
    "alembic>=1.13",
    "gevent>=23",
]
# The optional faster event loop (selector = "uvloop"); tested in CI too.
UVLOOP_REQUIRES = ["uvloop>=0.17"]
# The daemon's Prometheus endpoint (--metrics): an extra, so that an app that
# installs dbservice for its client gets no library only the daemon uses.
METRICS_REQUIRES = ["prometheus_client>=0.17"]

setup(
    name="dbservice",
    version="0.1.0",
    description="An async PostgreSQL query daemon with connection pooling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dbservice", "dbservice.*"]),
    python_requires=">=3.9",
    install_requires=[
        "psycopg2-binary>=2.9",
        "click>=8.0",
        'tomli>=1.1; python_version < "3.11"',
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6"]
        + BLOG_REQUIRES
        + UVLOOP_REQUIRES
        + METRICS_REQUIRES
        + SHOP_REQUIRES
        + ADOPTION_TEST_REQUIRES,
        "blog": BLOG_REQUIRES,
        "shop": SHOP_REQUIRES,
        "uvloop": UVLOOP_REQUIRES,
        "metrics": METRICS_REQUIRES,
        "plot": ["matplotlib>=3"],
        "sqlalchemy": ["sqlalchemy>=2.0.44"],
    },
    entry_points={
        "console_scripts": ["dbserviced = dbservice.cli:main"],
        # create_engine("postgresql+dbservice://") finds the dialect by this name.
        "sqlalchemy.dialects": ["postgresql.dbservice = dbservice.sqlalchemy:DBServiceDialect"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Database",
        "Operating System :: POSIX :: Linux",
    ],
)
