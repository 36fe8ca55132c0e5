"""The simulator: everything that fakes a cluster on one machine, never imported by production code.

``guests`` runs real responders as simulated guests (hangs, reboots); ``testnode`` writes libvirt
``test:///`` node files (fake hosts); ``localcluster`` starts a whole cluster from real processes;
``demo`` is ``vmq demo``. The ``vmq sim`` and ``vmq demo`` commands load these inside their functions.
"""
