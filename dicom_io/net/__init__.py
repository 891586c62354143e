"""DICOM networking: association settings and statuses (``network``), the Storage SCP that
receives (``scp``) and the Storage SCU that sends (``scu``)."""
