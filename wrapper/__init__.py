"""llama-trainer's command line, `lt`: the lifecycle verbs over the Ansible playbooks."""

__version__ = "0.1.0"
